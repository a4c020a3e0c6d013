"""Values that travel between the ingest path, the catalog and the transcoder."""

from __future__ import annotations

import enum

import attrs


class State(str, enum.Enum):
    """Where an instance stands in the transcoding pipeline."""

    PENDING = "pending"  # stored, codestreams not (yet) made for this generation
    STREAMABLE = "streamable"  # every frame has a codestream and an index
    NOT_STREAMABLE = "not_streamable"  # an image the JPIP transfer syntax cannot carry
    NOT_IMAGE = "not_image"  # SR, KOS, PR, RT...: stored and indexed only
    FAILED = "failed"  # transcoding failed; the reason says why


@attrs.frozen
class InstanceRecord:
    """The attributes of a received instance that queries (C-FIND, WADO) need."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
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
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None
    content_date: str = ""
    content_time: str = ""
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None
    bits_allocated: int | None = None
    bits_stored: int | None = None
    samples_per_pixel: int | None = None
    photometric_interpretation: str = ""
    specific_character_set: str = ""


@attrs.frozen
class FrameRecord:
    """One frame's codestream and its index, paths relative to the data directory."""

    frame_number: int  # 1-based, as in DICOM
    codestream_path: str
    codestream_size: int
    index_path: str
    width: int
    height: int
    components: int
    precision: int
    signed: bool


@attrs.frozen
class InstanceRow:
    """What the catalog knows about one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: str  # archive file, relative to the data directory
    size: int
    generation: int  # bumped every time the instance is received again
    state: State
    reason: str
    incoming: str | None  # name of the fsynced temporary file of the last receive


@attrs.frozen
class Counts:
    instances: int
    frames: int
    transcode_pending: int
    transcode_failed: int
    not_streamable: int
    streamable: int
    not_image: int
    studies: int
    series: int
