"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID


def wire_dataset(path: str | Path) -> tuple[bytes, UID, str, str]:
    """A Part 10 file's data set as it travels in a C-STORE: (bytes, syntax, class, instance)."""
    raw = Path(path).read_bytes()
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL, explicit LE
    ds = dcmread(path, stop_before_pixels=True)
    return (
        raw[144 + group_length :],
        ds.file_meta.TransferSyntaxUID,
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
    )
