"""The derived objects (JPIP Referenced header, native, JPEG 2000 lossless, de-identified),
checked with real transcoding and the independent validators dciodvfy, dcmdump and
opj_decompress."""

from __future__ import annotations

import copy
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from imageshare.codestream.markers import parse_main_header
from imageshare.dicom.derived import (
    JPEG2000_LOSSLESS,
    JPIP_REFERENCED,
    JPIP_REFERENCED_DEFLATE,
    DerivationError,
    deidentify,
    encode,
    encode_dataset,
    jpeg2000_lossless,
    jpip_referenced,
    jpip_url,
    native,
    read_part10,
)
from imageshare.dicom.filemeta import IMPLEMENTATION_CLASS_UID, encode_file_meta
from imageshare.store.records import FrameRecord
from imageshare.transcode import openjpeg
from imageshare.transcode.params import EncodeParams
from imageshare.transcode.pixels import classify, iter_frames
from tests.dicom.dciodvfy import dcmdump, dcmdump_ok, new_errors, requires_dciodvfy, requires_dcmdump, validate
from tests.helpers import make_instances, sample_file

requires_openjpeg = pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing")
requires_opj_decompress = pytest.mark.skipif(shutil.which("opj_decompress") is None,
                                             reason="opj_decompress missing")

URL = "http://127.0.0.1:8080"
GREY = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm"]
COLOUR = ["SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm"]
COMPRESSED = ["JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle_2frame.dcm",
              "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "MR_small_bigendian.dcm"]
# Image Pixel attributes the derived objects set from the codestream.
PIXEL_DESCRIPTION = {0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011,
                     0x00280100, 0x00280101, 0x00280102, 0x00280103}
PIXEL_DATA = {0x7FE00008, 0x7FE00009, 0x7FE00010, 0x7FE00001, 0x7FE00002, 0xFFFCFFFC}


def load(source: str | Path) -> Dataset:
    path = source if isinstance(source, Path) else sample_file(source)
    return read_part10(path.read_bytes())


def transcode(ds: Dataset, folder: Path, params: EncodeParams = EncodeParams()) -> tuple[list[FrameRecord], list[bytes]]:
    """Code every frame as the transcoder does; return its FrameRecords and codestreams."""
    info = classify(ds)
    frames, codestreams = [], []
    for number, frame in enumerate(iter_frames(ds, info), start=1):
        path = folder / f"f{number:05d}.j2k"
        precision = info.precision_of(frame)
        size = openjpeg.encode(frame, path, precision=precision, signed=info.signed,
                               colour_transform=info.colour_transform, params=params)
        frames.append(FrameRecord(number, path.name, size, "", info.columns, info.rows, info.samples,
                                  precision, info.signed))
        codestreams.append(path.read_bytes())
    return frames, codestreams


def monochrome1(folder: Path) -> Path:
    """A MONOCHROME1 CR made from MR_small (same pixels, inverted meaning)."""
    ds = dcmread(sample_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    path = folder / "cr_mono1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def meta_length(data: bytes) -> int:
    """Bytes of preamble, DICM and file meta group (its group length is at 140..143)."""
    return 144 + int.from_bytes(data[140:144], "little")


def private_tags(ds: Dataset) -> set[int]:
    return {int(e.tag) for e in ds if e.tag.is_private}


# --- JPIP Referenced -----------------------------------------------------------------


def test_jpip_url() -> None:
    """The provider URL already names the target in its query, so a client can append fields."""
    assert jpip_url("http://h:8080", "1.2.3") == "http://h:8080/jpip?target=1.2.3"
    assert jpip_url("https://h/base", "1.2.3") == "https://h/base/jpip?target=1.2.3"


@requires_openjpeg
@requires_dciodvfy
@requires_dcmdump
@pytest.mark.parametrize("name", GREY + COLOUR + ["MONOCHROME1"])
def test_jpip_referenced_header(name: str, tmp_path: Path) -> None:
    """The .94 header validates like its source, reads in dcmdump, carries the URL instead of
    Pixel Data, keeps every other attribute (private ones too) and describes the codestreams."""
    source = monochrome1(tmp_path) if name == "MONOCHROME1" else sample_file(name)
    original = load(source)
    before = copy.deepcopy(original)
    frames, codestreams = transcode(original, tmp_path)
    url = jpip_url(URL, original.SOPInstanceUID)

    header = jpip_referenced(original, frames, url)
    path = write(tmp_path, "jpip.dcm", encode(header))

    assert original == before, "the original was modified"
    assert new_errors(path, source) == set()
    assert dcmdump_ok(path)
    dump = dcmdump(path).stdout
    assert "=JPIPReferenced" in dump and "(0028,7fe0) UR" in dump
    assert "(7fe0,0010)" not in dump.lower()

    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPIP_REFERENCED
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert back.PixelDataProviderURL == url and back["PixelDataProviderURL"].VR == "UR"
    assert "PixelData" not in back
    siz = parse_main_header(codestreams[0]).siz
    assert (back.Columns, back.Rows) == (siz.xsiz, siz.ysiz)
    assert back.SamplesPerPixel == len(siz.components)
    assert back.BitsAllocated == (8 if siz.components[0].precision <= 8 else 16)
    assert back.BitsStored <= siz.components[0].precision and back.HighBit == back.BitsStored - 1
    assert back.PixelRepresentation == int(siz.components[0].signed)
    assert int(back.get("NumberOfFrames", 1)) == len(codestreams)
    if back.SamplesPerPixel == 3:
        assert back.PhotometricInterpretation == "YBR_RCT" and back.PlanarConfiguration == 0
    else:
        assert back.PhotometricInterpretation == original.PhotometricInterpretation
    assert private_tags(back) == private_tags(original)
    for elem in original:
        if elem.tag not in PIXEL_DESCRIPTION | PIXEL_DATA and elem.VR not in ("OW", "OF", "OL", "OD"):
            assert back[elem.tag].value == elem.value, elem


@requires_openjpeg
@requires_dcmdump
def test_jpip_referenced_deflate(tmp_path: Path) -> None:
    """The .95 object is the .94 data set raw-deflated after an uncompressed file meta;
    dcmdump reads it, and so does read_part10."""
    original = load("CT_small.dcm")
    frames, _ = transcode(original, tmp_path)
    header = jpip_referenced(original, frames, jpip_url(URL, original.SOPInstanceUID))

    data = encode(header, JPIP_REFERENCED_DEFLATE)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = inflater.decompress(data[meta_length(data):]) + inflater.flush()

    assert inflater.eof
    assert inflated == encode_dataset(header, JPIP_REFERENCED)
    assert encode_dataset(header, JPIP_REFERENCED_DEFLATE) == data[meta_length(data):]
    path = write(tmp_path, "jpip95.dcm", data)
    assert dcmdump_ok(path)
    dump = dcmdump(path).stdout
    assert "=JPIPReferencedDeflate" in dump and "(0028,7fe0) UR" in dump
    back = read_part10(data)
    assert back.file_meta.TransferSyntaxUID == JPIP_REFERENCED_DEFLATE
    assert back == header


def test_jpip_referenced_encoding_is_explicit_little_endian() -> None:
    """pydicom will not write .94, so the data set is written as Explicit VR Little Endian
    and the Part 10 file is our file meta followed by exactly those bytes."""
    original = load("MR_small_implicit.dcm")
    frames = [FrameRecord(1, "f.j2k", 1, "", 64, 64, 1, 16, True)]
    header = jpip_referenced(original, frames, jpip_url(URL, original.SOPInstanceUID))
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, header)

    data = encode(header)

    assert encode_dataset(header, JPIP_REFERENCED) == fp.getvalue()
    assert data == encode_file_meta(sop_class_uid=original.SOPClassUID,
                                    sop_instance_uid=original.SOPInstanceUID,
                                    transfer_syntax_uid=JPIP_REFERENCED) + fp.getvalue()


def test_jpip_referenced_photometric_rules() -> None:
    """Grey keeps MONOCHROME1/2, colour becomes YBR_RCT (YBR_ICT and lossy when the
    codestreams are irreversible); what the syntax cannot say is refused."""
    mr = load("MR_small.dcm")
    grey = [FrameRecord(1, "f", 1, "", 64, 64, 1, 16, True)]
    rgb = load("SC_rgb_small_odd.dcm")
    colour = [FrameRecord(1, "f", 1, "", 3, 3, 3, 8, False)]

    assert jpip_referenced(mr, grey, "u").PhotometricInterpretation == "MONOCHROME2"
    assert jpip_referenced(rgb, colour, "u").PhotometricInterpretation == "YBR_RCT"
    lossy = jpip_referenced(rgb, colour, "u", reversible=False)
    assert lossy.PhotometricInterpretation == "YBR_ICT" and lossy.LossyImageCompression == "01"
    palette = load("examples_palette.dcm")
    with pytest.raises(DerivationError):  # one component cannot stand for PALETTE COLOR
        jpip_referenced(palette, [FrameRecord(1, "f", 1, "", palette.Columns, palette.Rows, 1, 8, False)], "u")
    with pytest.raises(DerivationError):  # three components for a grey object
        jpip_referenced(mr, [FrameRecord(1, "f", 1, "", 64, 64, 3, 16, True)], "u")


def test_jpip_referenced_bit_depth() -> None:
    """Bits Allocated follows the codestream precision; Bits Stored stays the original's
    when the codestream holds it (the transcoder only ever raises the precision)."""
    ds = load("MR_small.dcm")
    ds.BitsStored, ds.HighBit = 12, 11

    deeper = jpip_referenced(ds, [FrameRecord(1, "f", 1, "", 64, 64, 1, 13, True)], "u")
    byte = jpip_referenced(ds, [FrameRecord(1, "f", 1, "", 64, 64, 1, 8, False)], "u")

    assert (deeper.BitsAllocated, deeper.BitsStored, deeper.HighBit, deeper.PixelRepresentation) == (16, 12, 11, 1)
    assert (byte.BitsAllocated, byte.BitsStored, byte.HighBit, byte.PixelRepresentation) == (8, 8, 7, 0)


def test_jpip_referenced_frame_mismatch() -> None:
    """A codestream count that differs from Number of Frames, or frames that differ, are refused."""
    two = load("SC_rgb_rle_2frame.dcm")
    frame = FrameRecord(1, "f", 1, "", 100, 100, 3, 8, False)
    with pytest.raises(DerivationError):
        jpip_referenced(two, [frame], "u")
    with pytest.raises(DerivationError):
        jpip_referenced(load("CT_small.dcm"), [], "u")
    with pytest.raises(DerivationError):
        jpip_referenced(two, [frame, FrameRecord(2, "f", 1, "", 100, 99, 3, 8, False)], "u")
    with pytest.raises(DerivationError):
        jpip_referenced(load("CT_small.dcm"), [FrameRecord(1, "f", 1, "", 128, 128, 1, 20, True)], "u")


# --- native ---------------------------------------------------------------------------


@requires_dciodvfy
@pytest.mark.parametrize("name", COMPRESSED)
def test_native_decodes_pixels(name: str, tmp_path: Path) -> None:
    """Compressed (and big endian) originals come out Explicit VR Little Endian with the
    pixels pydicom decodes from the original, and no new dciodvfy error."""
    original = load(name)
    before = copy.deepcopy(original)

    path = write(tmp_path, "native.dcm", encode(native(original)))

    assert original == before
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not back["PixelData"].is_undefined_length
    assert np.array_equal(back.pixel_array, original.pixel_array)
    if back.SamplesPerPixel == 3:
        assert back.PhotometricInterpretation == "RGB" and back.PlanarConfiguration == 0
    assert back.SOPInstanceUID == original.SOPInstanceUID
    assert new_errors(path, sample_file(name)) == set()


def test_native_non_image_is_reencoded(tmp_path: Path) -> None:
    """An object without pixels (RT Plan, read as Implicit VR) is only re-encoded."""
    original = load("rtplan.dcm")

    back = read_part10(encode(native(original)))

    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back == original


# --- JPEG 2000 lossless ----------------------------------------------------------------


def opj_pixels(codestream: bytes, folder: Path, rows: int, columns: int, signed: bool) -> np.ndarray:
    """Decode one codestream with the opj_decompress tool (RAWL: planar, little endian)."""
    j2k = write(folder, "frame.j2k", codestream)
    raw = folder / "frame.rawl"
    subprocess.run(["opj_decompress", "-i", str(j2k), "-o", str(raw)], check=True,
                   capture_output=True, timeout=60)
    precision = parse_main_header(codestream).siz.components[0].precision
    dtype = np.dtype(("<i" if signed else "<u") + ("1" if precision <= 8 else "2"))
    planes = np.frombuffer(raw.read_bytes(), dtype).reshape(-1, rows, columns)
    return planes[0] if len(planes) == 1 else np.moveaxis(planes, 0, -1)


@requires_openjpeg
@requires_dciodvfy
@requires_opj_decompress
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_small_odd.dcm",
                                  "SC_rgb_rle_2frame.dcm"])
def test_jpeg2000_lossless(name: str, tmp_path: Path) -> None:
    """.90 from our codestreams: opj_decompress of each fragment and pydicom's decode give
    the original pixels exactly, and dciodvfy finds nothing new."""
    original = load(name)
    before = copy.deepcopy(original)
    _, codestreams = transcode(original, tmp_path)

    path = write(tmp_path, "j2k.dcm", encode(jpeg2000_lossless(original, codestreams)))

    assert original == before
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == JPEG2000_LOSSLESS
    expected = original.pixel_array
    assert np.array_equal(back.pixel_array, expected)
    assert back.PhotometricInterpretation == ("YBR_RCT" if back.SamplesPerPixel == 3
                                              else original.PhotometricInterpretation)
    assert back.get("LossyImageCompression") == original.get("LossyImageCompression")
    frames = list(generate_frames(back.PixelData, number_of_frames=int(back.get("NumberOfFrames", 1))))
    per_frame = expected if len(frames) > 1 else expected[np.newaxis]
    for fragment, want in zip(frames, per_frame, strict=True):
        got = opj_pixels(fragment, tmp_path, back.Rows, back.Columns, bool(back.PixelRepresentation))
        assert np.array_equal(got, want)
    assert new_errors(path, sample_file(name)) == set()


@requires_openjpeg
def test_jpeg2000_lossless_refuses_what_is_not(tmp_path: Path) -> None:
    """Irreversible or broken codestreams, or the wrong count, are not passed off as .90."""
    original = load("MR_small.dcm")
    lossy = EncodeParams(lossless=False, layer_rates=(80, 40, 20))
    _, irreversible = transcode(original, tmp_path, lossy)
    with pytest.raises(DerivationError):
        jpeg2000_lossless(original, irreversible)
    with pytest.raises(DerivationError):
        jpeg2000_lossless(original, [b"\xff\x4f\xff\x51 not a codestream"])
    _, good = transcode(original, tmp_path)
    with pytest.raises(DerivationError):
        jpeg2000_lossless(original, good * 2)


# --- de-identification -----------------------------------------------------------------

IDENTIFYING = ["PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
               "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyID"]


@requires_dciodvfy
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_deidentify_removes_identity(name: str, tmp_path: Path) -> None:
    """No identifying value of the original is left anywhere in the encoded object, private
    attributes are gone, the method is recorded, and dciodvfy finds nothing new."""
    original = load(name)
    original.InstitutionName = "SAINT ELSEWHERE HOSPITAL"
    original.ReferringPhysicianName = "Kildare^James"
    original.add_new((0x0009, 0x0010), "LO", "ACME PRIVATE")
    original.add_new((0x0009, 0x1001), "LO", "Patient secret")
    source = write(tmp_path, "source.dcm", encode(original))
    before = copy.deepcopy(original)

    result = deidentify(original, salt=b"site secret")
    data = encode(result)

    assert original == before
    for keyword in IDENTIFYING:
        value = str(original.get(keyword) or "")
        if len(value) >= 4:
            assert value.encode() not in data, keyword
    assert b"Patient secret" not in data and not private_tags(result)
    assert result.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in result.DeidentificationMethodCodeSequence] == ["113100"]
    assert result.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert result.SOPClassUID == original.SOPClassUID
    assert result.SOPInstanceUID != original.SOPInstanceUID
    assert result.StudyInstanceUID.startswith("2.25.")
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    path = write(tmp_path, "deid.dcm", data)
    assert new_errors(path, source) == set()


def test_deidentify_uids_are_consistent(tmp_path: Path) -> None:
    """Two instances of one study get the same new study, series and frame of reference
    UIDs, distinct instance UIDs, and a reference from one to the other still resolves;
    another salt gives other UIDs."""
    first, second = (load(p) for p in make_instances(tmp_path, 2, seed="deid"))
    item = Dataset()
    item.ReferencedSOPClassUID = first.SOPClassUID
    item.ReferencedSOPInstanceUID = first.SOPInstanceUID
    item.add_new((0x0011, 0x0010), "LO", "NESTED PRIVATE")
    second.SourceImageSequence = [item]

    a, b = deidentify(first, salt=b"s1"), deidentify(second, salt=b"s1")
    again = deidentify(first, salt=b"s1")
    other = deidentify(first, salt=b"s2")

    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert a[keyword].value == b[keyword].value != first[keyword].value
        assert other[keyword].value != a[keyword].value
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert again.SOPInstanceUID == a.SOPInstanceUID
    reference = b.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == a.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == first.SOPClassUID
    assert not private_tags(reference)


def test_deidentify_curves_overlays_and_sequences() -> None:
    """Curves, overlay data (with its plane) and overlay comments go; identifying attributes
    inside sequence items are handled like top-level ones; dates are emptied."""
    ds = load("examples_overlay.dcm")
    assert (0x6000, 0x3000) in ds  # Overlay Data
    ds.add_new((0x5000, 0x3000), "OW", b"\x00\x01")
    ds.add_new((0x6002, 0x4000), "LT", "drawn by Dr Who")
    request = Dataset()
    request.RequestingPhysician = "Who^Doctor"
    request.AccessionNumber = "ACC-12345"
    ds.ReferencedStudySequence = [Dataset()]
    ds.ProcedureCodeSequence = [request]
    ds.StudyDate = "20240101"

    result = deidentify(ds, salt=b"")

    groups = {e.tag.group for e in result}
    assert not groups & set(range(0x5000, 0x5020)) and not groups & set(range(0x6000, 0x6020))
    item = result.ProcedureCodeSequence[0]
    assert "RequestingPhysician" not in item and item.AccessionNumber in ("", None)
    assert len(result.ReferencedStudySequence) == 0
    assert result.StudyDate in ("", None)


# --- encoding and reading ---------------------------------------------------------------


def test_encode_dataset_refuses_what_it_cannot_carry() -> None:
    """Nothing is transcoded silently: pixels under a JPIP syntax, encapsulated pixels under
    a native syntax, native pixels under an encapsulated one, and big endian are refused."""
    ct = load("CT_small.dcm")
    j2k = load("JPEG2000.dcm")
    with pytest.raises(DerivationError):
        encode_dataset(ct, JPIP_REFERENCED)
    with pytest.raises(DerivationError):
        encode_dataset(j2k, ExplicitVRLittleEndian)
    with pytest.raises(DerivationError):
        encode_dataset(ct, JPEG2000_LOSSLESS)
    with pytest.raises(DerivationError):
        encode_dataset(ct, ExplicitVRBigEndian)
    with pytest.raises(DerivationError):
        encode_dataset(ct, "1.2.3.4")
    header = jpip_referenced(ct, [FrameRecord(1, "f", 1, "", 128, 128, 1, 16, True)], "http://x/jpip?target=1")
    with pytest.raises(DerivationError):  # the pitfall of storescu converting .94 to Explicit LE
        encode_dataset(header, ExplicitVRLittleEndian)
    assert read_part10(encode(ct, ImplicitVRLittleEndian)) == ct
    assert read_part10(encode(ct, DeflatedExplicitVRLittleEndian)) == ct
    assert read_part10(encode(j2k)) == j2k


@pytest.mark.parametrize("data", [
    b"",
    b"\x00" * 200,
    b"\x00" * 128 + b"DICM",
    sample_file("CT_small.dcm").read_bytes()[:3000],
    sample_file("MR_truncated.dcm").read_bytes(),
    sample_file("CT_small.dcm").read_bytes()[:400] + b"\xff" * 64,
])
def test_read_part10_bad_input(data: bytes) -> None:
    """Garbage or truncated bytes raise a clear error instead of a half-read object."""
    with pytest.raises((InvalidDicomError, ValueError)):
        read_part10(data)


# --- the validator helper itself ---------------------------------------------------------


@requires_dciodvfy
def test_validator_sees_errors(tmp_path: Path) -> None:
    """The dciodvfy wrapper is not vacuous: Pixel Data next to the provider URL under .94 is
    an error, and an abort is reported as one."""
    original = load("MR_small.dcm")
    header = jpip_referenced(original, [FrameRecord(1, "f", 1, "", 64, 64, 1, 16, True)], "http://x/jpip?target=1")
    header.PixelData = original.PixelData
    header["PixelData"].VR = "OW"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, header)
    bad = write(tmp_path, "bad.dcm", encode_file_meta(
        sop_class_uid=original.SOPClassUID, sop_instance_uid=original.SOPInstanceUID,
        transfer_syntax_uid=JPIP_REFERENCED) + fp.getvalue())

    errors, _ = validate(bad)

    assert any("PixelData" in e for e in errors)
    assert any("aborted" in e for e in validate(sample_file("badVR.dcm"))[0])
