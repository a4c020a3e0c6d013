"""The hand-encoded Part 10 header."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from imageshare.dicom.filemeta import IMPLEMENTATION_CLASS_UID, encode_file_meta
from tests.helpers import sample_file, wire_dataset


def test_pydicom_reads_it(tmp_path: Path) -> None:
    """A file made of our header and a received data set reads back with the right meta."""
    data, ts, cls, sop = wire_dataset(sample_file("CT_small.dcm"))
    for aet in ("", "ODD", "EVENAE"):
        path = tmp_path / f"x{aet}.dcm"
        path.write_bytes(encode_file_meta(sop_class_uid=cls, sop_instance_uid=sop, transfer_syntax_uid=ts,
                                          source_aet=aet) + data)
        ds = dcmread(path)
        meta = ds.file_meta
        assert meta.MediaStorageSOPClassUID == cls
        assert meta.MediaStorageSOPInstanceUID == sop
        assert meta.TransferSyntaxUID == ts
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.get("SourceApplicationEntityTitle", "") == aet
        assert ds.SOPInstanceUID == sop
        assert meta.FileMetaInformationGroupLength == len(encode_file_meta(
            sop_class_uid=cls, sop_instance_uid=sop, transfer_syntax_uid=ts, source_aet=aet)) - 144
