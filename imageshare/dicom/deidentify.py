"""PS3.15 Annex E Basic Application Level Confidentiality Profile (pure).

:func:`deidentify` applies the basic-profile action codes of PS3.15 Table E.1-1 to a data
set and its sequences, removes private attributes, curves and overlay data, replaces the
UIDs the table marks ``U`` with UIDs derived from a salted hash (so that every instance of a
study maps to the same new Study Instance UID), and records what was done
(Patient Identity Removed, De-identification Method and its Code Sequence). No option of
the profile (retain dates, device or institution identity, safe private...) is applied.

Where the table offers a choice (``X/Z``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) the right-most
action is taken: it is the one that keeps the object conformant whatever the attribute's
Type in its IOD (a Type 1 attribute needs ``D``, Type 2 ``Z``), and this module does not
know every IOD. ``D`` on a sequence and ``U*`` keep the items and de-identify them
recursively.
"""

from __future__ import annotations

import copy
import hashlib

from pydicom import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence

__all__ = ["BASIC_PROFILE", "deidentify", "deidentified_uid"]

#: Table E.1-1, "Basic Prof." column: DICOM keyword -> action code. X remove, Z empty,
#: D dummy value, U new UID (consistently), ``U*`` keep the sequence and replace its UIDs.
#: The repeating groups (curves 50xx, overlay data and comments 60xx,3000/4000) and
#: private attributes are handled in code.
BASIC_PROFILE: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionComments": "X",
    "AcquisitionContextSequence": "X",
    "AcquisitionDate": "X/Z",
    "AcquisitionDateTime": "X/D",
    "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionProtocolDescription": "X",
    "AcquisitionTime": "X/Z",
    "ActualHumanPerformersSequence": "X",
    "AdditionalPatientHistory": "X",
    "AddressTrial": "X",
    "AdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingTime": "X",
    "Allergies": "X",
    "Arbitrary": "X",
    "AuthorObserverSequence": "X",
    "BranchOfService": "X",
    "CassetteID": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ConcatenationUID": "U",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    "ConsultingPhysicianIdentificationSequence": "X",
    "ConsultingPhysicianName": "Z",
    "ContentCreatorIdentificationCodeSequence": "X",
    "ContentCreatorName": "Z",
    "ContentDate": "Z/D",
    "ContentSequence": "X",
    "ContentTime": "Z/D",
    "ContextGroupExtensionCreatorUID": "U",
    "ContrastBolusAgent": "Z/D",
    "ContributionDescription": "X",
    "CountryOfResidence": "X",
    "CreatorVersionUID": "U",
    "CurrentObserverTrial": "X",
    "CurrentPatientLocation": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "CustodialOrganizationSequence": "X",
    "DataSetTrailingPadding": "X",
    "DerivationDescription": "X",
    "DetectorID": "X/D",
    "DeviceSerialNumber": "X/Z/D",
    "DeviceUID": "U",
    "DigitalSignaturesSequence": "X",
    "DigitalSignatureUID": "X",
    "DimensionOrganizationUID": "U",
    "DischargeDiagnosisDescription": "X",
    "DistributionAddress": "X",
    "DistributionName": "X",
    "DoseReferenceUID": "U",
    "EthnicGroup": "X",
    "ExpectedCompletionDateTime": "X",
    "FailedSOPInstanceUIDList": "U",
    "FiducialUID": "U",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "FrameComments": "X",
    "FrameOfReferenceUID": "U",
    "GantryID": "X",
    "GeneratorID": "X",
    "GraphicAnnotationSequence": "D",
    "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X",
    "IconImageSequence": "X",
    "IdentifyingComments": "X",
    "ImageComments": "X",
    "ImagePresentationComments": "X",
    "ImagingServiceRequestComments": "X",
    "Impressions": "X",
    "InstanceCoercionDateTime": "X",
    "InstanceCreatorUID": "U",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "InstitutionalDepartmentTypeCodeSequence": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionName": "X/Z/D",
    "InsurancePlanIdentification": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "InterpretationApproverSequence": "X",
    "InterpretationAuthor": "X",
    "InterpretationDiagnosisDescription": "X",
    "InterpretationIDIssuer": "X",
    "InterpretationRecorder": "X",
    "InterpretationText": "X",
    "InterpretationTranscriber": "X",
    "IrradiationEventUID": "U",
    "IssuerOfAccessionNumberSequence": "X",
    "IssuerOfAdmissionID": "X",
    "IssuerOfPatientID": "X",
    "IssuerOfPatientIDQualifiersSequence": "X",
    "IssuerOfServiceEpisodeID": "X",
    "LargePaletteColorLookupTableUID": "U",
    "LastMenstrualDate": "X",
    "MAC": "X",
    "MedicalAlerts": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "ModifiedAttributesSequence": "X",
    "ModifiedImageDescription": "X",
    "ModifyingDeviceID": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "ObservationDateTrial": "X",
    "ObservationSubjectUIDTrial": "X",
    "ObservationTimeTrial": "X",
    "ObservationUID": "U",
    "Occupation": "X",
    "OperatorIdentificationSequence": "X/D",
    "OperatorsName": "X/Z/D",
    "OrderCallbackPhoneNumber": "X",
    "OrderCallbackTelecomInformation": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OriginalAttributesSequence": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "PaletteColorLookupTableUID": "U",
    "ParticipantSequence": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientAlternativeCalendar": "X",
    "PatientBirthDate": "Z",
    "PatientBirthDateInAlternativeCalendar": "X",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientDeathDateInAlternativeCalendar": "X",
    "PatientID": "Z",
    "PatientInstitutionResidence": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientPrimaryLanguageModifierCodeSequence": "X",
    "PatientReligiousPreference": "X",
    "PatientSex": "Z",
    "PatientSexNeutered": "X/Z",
    "PatientSize": "X",
    "PatientState": "X",
    "PatientTelecomInformation": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTransportArrangements": "X",
    "PatientWeight": "X",
    "PerformedLocation": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationGeographicLocationCodeSequence": "X",
    "PerformedStationName": "X",
    "PerformedStationNameCodeSequence": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PersonAddress": "X",
    "PersonIdentificationCodeSequence": "D",
    "PersonName": "D",
    "PersonTelecomInformation": "X",
    "PersonTelephoneNumbers": "X",
    "PhysicianApprovingInterpretation": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "PlateID": "X",
    "PregnancyStatus": "X",
    "PreMedication": "X",
    "PresentationDisplayCollectionUID": "U",
    "PresentationSequenceCollectionUID": "U",
    "ProtocolName": "X/D",
    "ReasonForStudy": "X",
    "ReasonForTheImagingServiceRequest": "X",
    "ReferencedDigitalSignatureSequence": "X",
    "ReferencedFrameOfReferenceUID": "U",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",
    "ReferencedImageSequence": "X/Z/U*",
    "ReferencedObservationUIDTrial": "X",
    "ReferencedPatientAliasSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedSOPInstanceMACSequence": "X",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedSOPInstanceUIDInFile": "U",
    "ReferencedStudySequence": "X/Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RegionOfResidence": "X",
    "RelatedFrameOfReferenceUID": "U",
    "RequestAttributesSequence": "X",
    "RequestedContrastAgent": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureDescription": "X/Z",
    "RequestedProcedureID": "X",
    "RequestedProcedureLocation": "X",
    "RequestedSOPInstanceUID": "U",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "ResultsComments": "X",
    "ResultsDistributionListSequence": "X",
    "ResultsIDIssuer": "X",
    "ReviewerName": "X/Z",
    "ScheduledHumanPerformersSequence": "X",
    "ScheduledPatientInstitutionResidence": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledStationAETitle": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X",
    "ScheduledStationName": "X",
    "ScheduledStationNameCodeSequence": "X",
    "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    "SeriesDate": "X",
    "SeriesDescription": "X",
    "SeriesInstanceUID": "U",
    "SeriesTime": "X",
    "ServiceEpisodeDescription": "X",
    "ServiceEpisodeID": "X",
    "SmokingStatus": "X",
    "SOPInstanceUID": "U",
    "SourceImageSequence": "X/Z/U*",
    "SpecialNeeds": "X",
    "StationAETitle": "X",
    "StationName": "X/Z/D",
    "StorageMediaFileSetUID": "U",
    "StudyComments": "X",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyIDIssuer": "X",
    "StudyInstanceUID": "U",
    "StudyTime": "Z",
    "SynchronizationFrameOfReferenceUID": "U",
    "TemplateExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U",
    "TextComments": "X",
    "TextString": "X",
    "TimezoneOffsetFromUTC": "X",
    "TopicAuthor": "X",
    "TopicKeywords": "X",
    "TopicSubject": "X",
    "TopicTitle": "X",
    "TransactionUID": "U",
    "UID": "U",
    "VerbalSourceIdentifierCodeSequenceTrial": "X",
    "VerbalSourceTrial": "X",
    "VerifyingObserverIdentificationCodeSequence": "Z",
    "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "D",
    "VerifyingOrganization": "X",
    "VisitComments": "X",
}


def _resolve(code: str) -> str:
    """The action applied for a table code: the right-most choice (see the module text)."""
    return code.split("/")[-1].rstrip("*")


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # a typo in the table must fail loudly, not skip an attribute
        raise KeyError(f"unknown DICOM keyword in the profile table: {keyword}")
    return int(tag)


_ACTIONS: dict[int, str] = {_tag(k): _resolve(v) for k, v in BASIC_PROFILE.items()}

# Dummy values for D, by VR: not identifying, valid for the VR.
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY: dict[str, object] = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "FL": 0.0,
    "FD": 0.0,
}
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})

_CURVE_GROUPS = range(0x5000, 0x5020, 2)
_OVERLAY_GROUPS = range(0x6000, 0x6020, 2)
_OVERLAY_DATA, _OVERLAY_COMMENTS = 0x3000, 0x4000

PROFILE_NAME = "Basic Application Confidentiality Profile"
_PROFILE_CODE = ("113100", "DCM", PROFILE_NAME)


def deidentified_uid(uid: str, salt: bytes) -> str:
    """The UID that replaces ``uid``: the same for the same salt, a ``2.25.`` UID (PS3.5 B.2).

    Parameters
    ----------
    uid : str
        The original UID.
    salt : bytes
        Secret that keeps the mapping from being reversed by hashing candidate UIDs.
    """
    digest = hashlib.sha256(salt + b"\x00" + uid.strip("\x00 ").encode("ascii", "replace")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _replace_uids(elem: DataElement, salt: bytes) -> None:
    if elem.VM == 0:
        return
    if elem.VM > 1:
        elem.value = [deidentified_uid(str(v), salt) for v in elem.value]
    else:
        elem.value = deidentified_uid(str(elem.value), salt)


def _apply(ds: Dataset, elem: DataElement, action: str, salt: bytes) -> None:
    if action == "X":
        del ds[elem.tag]
    elif action == "Z":
        elem.value = Sequence() if elem.VR == "SQ" else None
    elif action == "U" and elem.VR == "SQ":  # U*: keep the references, with new UIDs
        _clean_items(elem, salt)
    elif action == "U" or (action == "D" and elem.VR == "UI"):
        _replace_uids(elem, salt)
    elif action == "D":
        if elem.VR == "SQ":
            _clean_items(elem, salt, dummy=True)
        elif elem.VR in _TEXT_VRS:
            elem.value = _DUMMY_TEXT
        else:
            elem.value = _DUMMY.get(elem.VR)
    else:  # pragma: no cover - the table only holds the codes above
        raise ValueError(f"unknown action {action!r}")


def _clean_items(elem: DataElement, salt: bytes, *, dummy: bool = False) -> None:
    for item in elem.value:
        _clean(item, salt, dummy=dummy)


def _is_overlay(tag: int) -> bool:
    return (tag >> 16) in _OVERLAY_GROUPS


def _clean(ds: Dataset, salt: bytes, *, dummy: bool = False) -> None:
    """De-identify one data set (an object or a sequence item) in place.

    ``dummy``: the item belongs to a sequence whose action is D, "items with dummy
    values": attributes the table removes are given dummy values instead, since the
    item's structure (e.g. Type 1 attributes of a Verifying Observer) has to stay.
    """
    # Overlay planes whose data is removed go entirely: their other attributes would
    # describe an overlay that is no longer there.
    gone_overlays = {t >> 16 for t in ds.keys() if _is_overlay(t) and t & 0xFFFF == _OVERLAY_DATA}
    for tag in list(ds.keys()):
        group = tag >> 16
        if (
            tag.is_private
            or group in _CURVE_GROUPS
            or group in gone_overlays
            or (_is_overlay(tag) and tag & 0xFFFF == _OVERLAY_COMMENTS)
        ):
            del ds[tag]
            continue
        elem = ds[tag]
        action = _ACTIONS.get(int(tag))
        if action == "X" and dummy:
            action = "D"
        if action is not None:
            _apply(ds, elem, action, salt)
        elif elem.VR == "SQ":
            _clean_items(elem, salt, dummy=dummy)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def deidentify(ds: Dataset, *, salt: bytes) -> Dataset:
    """A de-identified copy of ``ds`` (PS3.15 Annex E basic profile, no options).

    Parameters
    ----------
    ds : pydicom.Dataset
        The object; it is not modified. Its ``file_meta`` (if any) is copied with the new
        Media Storage SOP Instance UID.
    salt : bytes
        Secret for the UID mapping; the same salt maps a given UID to the same new UID
        in every object, so references between de-identified objects still resolve.

    Returns
    -------
    pydicom.Dataset
        The de-identified object, with Patient Identity Removed ``YES``, the
        De-identification Method and its Code Sequence (113100, DCM).
    """
    out = copy.deepcopy(ds)
    _clean(out, salt)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = PROFILE_NAME
    codes = out.get("DeidentificationMethodCodeSequence") or Sequence()
    if not any(item.get("CodeValue") == _PROFILE_CODE[0] for item in codes):
        codes.append(_code_item(*_PROFILE_CODE))
    out.DeidentificationMethodCodeSequence = codes
    # The dates the profile empties or removes can no longer place the study in time.
    out.LongitudinalTemporalInformationModified = "REMOVED"
    meta = getattr(out, "file_meta", None)
    if meta is not None and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID") or deidentified_uid(
            str(meta.MediaStorageSOPInstanceUID), salt
        )
    return out
