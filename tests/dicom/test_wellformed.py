"""The structural check that keeps truncated or malformed data sets out of the archive."""

from __future__ import annotations

import io
import zlib

import pytest
from hypothesis import given, strategies as st
from pydicom import dcmread
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from tests.helpers import sample_file
from imageshare.dicom.wellformed import InflatedTooLarge, MalformedDataset, check_dataset, inflate

SAMPLES = [
    "CT_small.dcm",  # explicit little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",  # encapsulated pixel data
    "JPEG2000.dcm",
    "rtplan.dcm",  # nested sequences
    "image_dfl.dcm",  # deflated
]


def encoded(name: str) -> tuple[bytes, UID]:
    """The data set of a test file as it would arrive on the wire (no file meta)."""
    ds = dcmread(sample_file(name))
    ts = ds.file_meta.TransferSyntaxUID
    raw = open(sample_file(name), "rb").read()
    # The data set starts right after the file meta group (its length is at 140..143).
    group_length = int.from_bytes(raw[140:144], "little")
    start = 144 + group_length
    return raw[start:], ts


def check(data: bytes, ts: UID) -> None:
    if ts.is_deflated:
        data = inflate(data)
    check_dataset(data, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)


@pytest.mark.parametrize("name", SAMPLES)
def test_real_files_pass(name: str) -> None:
    """Complete data sets of every encoding pass the check."""
    data, ts = encoded(name)
    check(data, ts)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "MR_small_bigendian.dcm"])
def test_every_truncation_is_detected(name: str) -> None:
    """Cutting a data set at any element boundary or inside a value is detected."""
    data, ts = encoded(name)
    # Every cut point would be slow on big files; every 7th byte plus the last 64 is plenty.
    cuts = sorted(set(range(1, len(data), 7)) | set(range(max(1, len(data) - 64), len(data))))
    undetected = []
    for cut in cuts:
        try:
            check(data[:cut], ts)
        except MalformedDataset:
            continue
        undetected.append(cut)
    # A cut exactly on a top-level element boundary yields a shorter, valid data set;
    # anything else must be caught. Verify the survivors really are element boundaries.
    assert all(_is_top_level_boundary(data, ts, cut) for cut in undetected), undetected[:5]


def _is_top_level_boundary(data: bytes, ts: UID, cut: int) -> bool:
    from imageshare.dicom.wellformed import _Walker

    w = _Walker(data, ts.is_implicit_VR, ts.is_little_endian)
    pos = 0
    while pos < len(data):
        if pos == cut:
            return True
        tag, vr, length, value = w.header(pos, ts.is_implicit_VR)
        if length == 0xFFFFFFFF:
            if tag == 0x7FE00010 or vr in (b"OB", b"OW"):
                pos = w.fragments(value)
            else:
                pos = w.items(value, len(data), 1, delimited=True)
        else:
            pos = value + length
    return pos == cut


def test_deflated_truncation_is_detected() -> None:
    """A cut deflate stream is refused before the data set is even walked."""
    data, ts = encoded("image_dfl.dcm")
    with pytest.raises(MalformedDataset):
        inflate(data[: len(data) // 2])
    with pytest.raises(MalformedDataset):
        inflate(b"not deflate at all")


def test_empty_and_garbage() -> None:
    """Empty input and a wrong VR are malformed."""
    with pytest.raises(MalformedDataset):
        check_dataset(b"", implicit_vr=False, little_endian=True)
    with pytest.raises(MalformedDataset):
        check_dataset(b"\x08\x00\x16\x00\x01\x02\x04\x00abcd", implicit_vr=False, little_endian=True)


def test_written_dataset_round_trip() -> None:
    """What pydicom writes (implicit VR, little endian) passes."""
    ds = dcmread(sample_file("rtplan.dcm"))
    fp = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    f = DicomFileLike(fp)
    f.is_little_endian, f.is_implicit_VR = True, True
    write_dataset(f, ds)
    check_dataset(fp.getvalue(), implicit_vr=True, little_endian=True)


@given(st.binary(max_size=2048), st.booleans(), st.booleans())
def test_garbage_never_crashes(data: bytes, implicit: bool, little: bool) -> None:
    """Arbitrary bytes either pass or raise MalformedDataset; nothing else escapes."""
    try:
        check_dataset(data, implicit_vr=implicit, little_endian=little)
    except MalformedDataset:
        pass


@given(st.data())
def test_mutations_never_crash(data: st.DataObject) -> None:
    """Random byte overwrites of a real data set never make the checker raise anything else."""
    raw, ts = encoded("rtplan.dcm")
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    try:
        check_dataset(bytes(buf), implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    except MalformedDataset:
        pass


def test_deflate_expansion() -> None:
    """A highly compressible stream inflates in full (the cap is far above real data sets)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = c.compress(b"\x00" * (1 << 20)) + c.flush()
    assert len(inflate(payload)) == 1 << 20


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def test_inflate_limit_is_exact() -> None:
    """A stream inflating to exactly the limit passes; one byte more is refused."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    stream = _deflate(payload)
    assert inflate(stream, len(payload)) == payload
    with pytest.raises(InflatedTooLarge) as info:
        inflate(stream, len(payload) - 1)
    assert info.value.limit == len(payload) - 1


def test_deflate_bomb_is_refused_holding_no_more_than_the_limit() -> None:
    """A 64 MiB bomb against a 1 MiB limit is refused, and the inflation never allocates
    much more than the limit (tracemalloc peak under 4 MiB)."""
    import tracemalloc

    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
    assert len(bomb) < 128 << 10
    tracemalloc.start()
    try:
        with pytest.raises(InflatedTooLarge):
            inflate(bomb, 1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


@given(st.binary(max_size=5000), st.integers(0, 6000), st.integers(1, 64))
def test_inflate_limit_property(data: bytes, limit: int, cut: int) -> None:
    """Any payload inflates in full when the limit allows it and is refused otherwise; a cut
    stream is never mistaken for a complete one."""
    stream = _deflate(data)
    if len(data) <= limit:
        assert inflate(stream, limit) == data
    else:
        with pytest.raises(InflatedTooLarge):
            inflate(stream, limit)
    if cut < len(stream):
        with pytest.raises((MalformedDataset, InflatedTooLarge)):
            inflate(stream[:-cut], limit)
