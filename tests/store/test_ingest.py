"""Receiving instances: checks, durable storage, catalog records, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from imageshare.store.archive import Archive
from imageshare.store.catalog import SqliteCatalog
from imageshare.store.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    IngestError,
    Ingestor,
)
from imageshare.store.records import State
from tests.helpers import wire_dataset, sample_file


@pytest.fixture
def ingestor(tmp_path: Path):
    catalog = SqliteCatalog(tmp_path / "c.db")
    yield Ingestor(Archive(tmp_path / "archive"), catalog), catalog, tmp_path
    catalog.close()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm", "rtplan.dcm"])
def test_store_keeps_the_bytes_and_records(ingestor, name: str) -> None:
    """The archived file is the received data set behind a proper file meta, and it is cataloged."""
    ing, catalog, root = ingestor
    data, ts, cls, sop = wire_dataset(sample_file(name))
    # The listener hands over a view of pynetdicom's buffer, not bytes.
    stored = ing.store(memoryview(data), transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=sop,
                       calling_aet="PACS")
    path = root / "archive" / stored.path
    assert path.read_bytes().endswith(data)
    original = dcmread(sample_file(name))
    archived = dcmread(path)
    assert archived.file_meta.TransferSyntaxUID == ts
    assert archived.file_meta.SourceApplicationEntityTitle == "PACS"
    assert archived.SOPInstanceUID == original.SOPInstanceUID
    if "PixelData" in original:
        assert archived.PixelData == original.PixelData
    row = catalog.get_instance(sop)
    assert row is not None and row.state is State.PENDING and row.generation == 1
    assert stored.record.patient_id == str(original.get("PatientID", ""))


def test_resend_replaces(ingestor) -> None:
    """Receiving the same instance again (from its source: replace = same_source is the
    default) replaces it and bumps the generation."""
    ing, catalog, root = ingestor
    data, ts, cls, sop = wire_dataset(sample_file("CT_small.dcm"))
    ing.store(data, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=sop, calling_aet="A")
    catalog.complete(sop, 1, State.STREAMABLE, "", [])
    again = ing.store(data, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=sop, calling_aet="A")
    assert again.generation == 2
    row = catalog.get_instance(sop)
    assert row is not None and row.state is State.PENDING
    assert catalog.counts().instances == 1


def _refused(ing: Ingestor, data: bytes, ts: str, cls: str, sop: str) -> IngestError:
    with pytest.raises(IngestError) as info:
        ing.store(data, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=sop, calling_aet="X")
    return info.value


def test_refusals_store_nothing(ingestor) -> None:
    """Truncated, garbage, UID-less and mismatched data sets are refused and nothing is kept."""
    ing, catalog, root = ingestor
    data, ts, cls, sop = wire_dataset(sample_file("CT_small.dcm"))
    cases = [
        (data[: len(data) - 100], ts, cls, sop, CANNOT_UNDERSTAND, "malformed"),
        (b"\x01\x02garbage" * 10, ts, cls, sop, CANNOT_UNDERSTAND, "malformed"),
        (data, ts, cls, "1.2.3.999", CANNOT_UNDERSTAND, "differs"),
        (data, ts, "1.2.840.10008.5.1.4.1.1.4", sop, DATASET_DOES_NOT_MATCH_SOP_CLASS, "Class"),
        (data, "1.2.3.4.5", cls, sop, CANNOT_UNDERSTAND, "transfer syntax"),
    ]
    for payload, t, c, s, status, words in cases:
        e = _refused(ing, payload, t, c, s)
        assert e.status == status and words in e.comment
        assert len(e.comment) <= 64
    assert catalog.counts().instances == 0
    assert list((root / "archive" / "incoming").iterdir()) == []
    assert list((root / "archive" / "objects").iterdir()) == []


def _deflated_with_padding(name: str, padding: int) -> tuple[bytes, str, str, str]:
    """A deflated data set: the file's own elements, then a private OB of ``padding`` zeros."""
    import struct
    import zlib

    data, _, cls, sop = wire_dataset(sample_file(name))
    plain = (
        data
        + struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 4) + b"TEST"
        + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, padding) + bytes(padding)
    )
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(plain) + c.flush(), "1.2.840.10008.1.2.1.99", cls, sop


def test_object_size_limit(tmp_path: Path) -> None:
    """Past max_object_size a data set is refused with Out of Resources, a deflated one counted
    inflated (a 33 KiB stream inflating to 8 MiB); one within the limit is stored."""
    catalog = SqliteCatalog(tmp_path / "c.db")
    try:
        ing = Ingestor(Archive(tmp_path / "archive"), catalog, max_object_size=1 << 20)
        bomb, ts, cls, sop = _deflated_with_padding("CT_small.dcm", 8 << 20)
        assert len(bomb) < 64 << 10
        e = _refused(ing, bomb, ts, cls, sop)
        assert e.status == OUT_OF_RESOURCES and "larger than 1048576 bytes" in e.comment
        data, plain_ts, cls, sop = wire_dataset(sample_file("CT_small.dcm"))
        e = _refused(ing, data + bytes(1 << 20), plain_ts, cls, sop)
        assert e.status == OUT_OF_RESOURCES
        assert catalog.counts().instances == 0
        fits, ts, cls, sop = _deflated_with_padding("CT_small.dcm", 500 << 10)
        stored = ing.store(fits, transfer_syntax=ts, sop_class_uid=cls, sop_instance_uid=sop, calling_aet="X")
        assert stored.record.sop_instance_uid == sop
    finally:
        catalog.close()


def test_missing_sop_instance_uid(ingestor) -> None:
    """A data set without SOP Instance UID gets a failure status saying so."""
    import io

    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    ing, catalog, _ = ingestor
    ds = dcmread(sample_file("CT_small.dcm"))
    del ds.SOPInstanceUID
    fp = io.BytesIO()
    f = DicomFileLike(fp)
    f.is_little_endian, f.is_implicit_VR = True, False
    write_dataset(f, ds)
    e = _refused(ing, fp.getvalue(), "1.2.840.10008.1.2.1", str(ds.SOPClassUID), "1.2.3")
    assert "no SOP Instance UID" in e.comment
    assert catalog.counts().instances == 0


def test_recover_after_commit_before_publish(ingestor) -> None:
    """A crash between the catalog commit and the rename is finished by recovery."""
    ing, catalog, root = ingestor
    archive = Archive(root / "archive")
    data, ts, cls, sop = wire_dataset(sample_file("CT_small.dcm"))
    incoming = archive.write_incoming(sop, [b"x" * 10])
    catalog.record_instance(
        ing.parse(data, ts), path=archive.relative_path(sop), size=10,
        incoming=incoming.name, calling_aet="",
    )
    stray = archive.write_incoming("1.2.3.4", [b"y"])
    assert ing.recover() == (1, 1)
    assert (root / "archive" / archive.relative_path(sop)).read_bytes() == b"x" * 10
    assert not (archive.incoming / stray.name).exists()
