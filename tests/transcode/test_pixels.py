"""Tests for :mod:`imageshare.transcode.pixels`, including the lossless proof over
pydicom's own test images."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.processing import convert_color_space
from pydicom.uid import UID, ExplicitVRLittleEndian, MPEG2MPML, RLELossless

from imageshare.transcode import openjpeg
from imageshare.transcode.errors import NotAnImage, NotStreamable, TranscodeError
from imageshare.transcode.params import EncodeParams
from imageshare.transcode.pixels import ImageInfo, classify, iter_frames, required_precision

PARAMS = EncodeParams()

#: Frames checked per file in the lossless proof: enough to cover every
#: multi-frame file pydicom ships today (at most 2 lossless frames) while keeping
#: a future large multi-frame file from blowing the time budget.
MAX_FRAMES_PER_FILE = 8

#: Transfer syntaxes whose decoded pixels are exactly the original pixels.
LOSSLESS_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless P14",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
}

#: Lossless-syntax test files with pixel data that must be refused, and why.
EXPECTED_REFUSALS = {
    "liver_1frame.dcm": "Bits Allocated 1 is not supported",
    "liver_expb_1frame.dcm": "Bits Allocated 1 is not supported",
    "rtdose.dcm": "Bits Allocated 32 is not supported",
    "rtdose_1frame.dcm": "Bits Allocated 32 is not supported",
    "rtdose_expb.dcm": "Bits Allocated 32 is not supported",
    "rtdose_expb_1frame.dcm": "Bits Allocated 32 is not supported",
    "rtdose_rle.dcm": "Bits Allocated 32 is not supported",
    "rtdose_rle_1frame.dcm": "Bits Allocated 32 is not supported",
    "SC_rgb_rle_32bit.dcm": "Bits Allocated 32 is not supported",
    "SC_rgb_rle_32bit_2frame.dcm": "Bits Allocated 32 is not supported",
    "badVR.dcm": "Bits Allocated 32 is not supported",
    "examples_palette.dcm": "PALETTE COLOR",
    "MR_truncated.dcm": "Pixel Data is 8130 bytes but 1 frame(s) of 64 x 64 x 1 at 16 bits "
    "need 8192",
    "nested_priv_SQ.dcm": "Rows is missing",
}

#: Native YCbCr sources: iter_frames converts them to RGB (not bit-lossless).
NATIVE_YBR = {"YBR_FULL", "YBR_FULL_422"}

_TEST_ROOT = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]


def _read(path: str | Path, **kwargs: Any) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test files are deliberately odd
        return dcmread(path, **kwargs)


def _lossless_test_files() -> list[Any]:
    params = []
    for path in sorted(get_testdata_files()):
        if not os.path.isfile(path):
            continue
        try:
            ds = _read(path, stop_before_pixels=True)
        except Exception:
            continue  # not DICOM (json, dumps, ICC profile, gz, no preamble)
        ts = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
        if ts in LOSSLESS_SYNTAXES:
            name = os.path.relpath(path, _TEST_ROOT)
            params.append(pytest.param(path, id=name))
    return params


LOSSLESS_FILES = _lossless_test_files()


def _frame_count(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


@pytest.mark.skipif(not openjpeg.is_available(), reason="OpenJPEG >= 2.5 missing")
@pytest.mark.parametrize("path", LOSSLESS_FILES)
@pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding")
def test_lossless_proof_on_pydicom_test_files(path: str, tmp_path: Path) -> None:
    """For every pydicom test file in a lossless transfer syntax: classify it; files
    without Pixel Data are NotAnImage, the known unsupported ones are NotStreamable
    with their specific reason, and every other one is streamable. For streamable
    files, each of the first MAX_FRAMES_PER_FILE (8) frames from iter_frames equals
    pydicom's own pixel_array for that frame (for native YCbCr sources: equals
    convert_color_space(raw YCbCr, RGB), the documented non-bit-lossless case),
    and encoding it at required_precision then decoding gives it back exactly."""
    name = os.path.basename(path)
    ds = _read(path)
    if name in EXPECTED_REFUSALS:
        with pytest.raises(NotStreamable, match=re.escape(EXPECTED_REFUSALS[name])):
            classify(ds)
        return
    if "PixelData" not in ds:
        with pytest.raises(NotAnImage):
            classify(ds)
        return

    info = classify(ds)
    assert info.frames == _frame_count(ds)
    reference = _read(path).pixel_array  # pydicom's own decoding, all frames
    if info.frames == 1:
        reference = reference[np.newaxis]
    checked = 0
    for index, frame in enumerate(iter_frames(ds, info)):
        if index == MAX_FRAMES_PER_FILE:
            break
        if info.source_photometric in NATIVE_YBR:
            raw = pixel_array(path, index=index, raw=True)
            expected = convert_color_space(raw, "YBR_FULL", "RGB")
            np.testing.assert_array_equal(expected, reference[index])
        else:
            expected = reference[index]
        np.testing.assert_array_equal(frame, expected)

        precision = required_precision(frame, info)
        target = tmp_path / f"{index}.j2k"
        openjpeg.encode(
            frame,
            target,
            precision=precision,
            signed=info.signed,
            colour_transform=info.colour_transform,
            params=PARAMS,
        )
        np.testing.assert_array_equal(openjpeg.decode(target), frame)
        checked += 1
    assert checked == min(info.frames, MAX_FRAMES_PER_FILE)


def test_lossless_proof_covers_each_lossless_syntax() -> None:
    """The proof above includes streamable images in every lossless transfer syntax
    pydicom ships examples for (JPEG Lossless P14 .57 has none)."""
    seen = set()
    for param in LOSSLESS_FILES:
        path = param.values[0]
        if os.path.basename(path) in EXPECTED_REFUSALS:
            continue
        ds = _read(path, stop_before_pixels=True)
        if "Rows" in ds:
            seen.add(str(ds.file_meta.TransferSyntaxUID))
    assert seen == set(LOSSLESS_SYNTAXES) - {"1.2.840.10008.1.2.4.57"}


# --- classification of specific files ------------------------------------------------


def _classify_file(name: str) -> ImageInfo:
    return classify(_read(get_testdata_file(name)))  # type: ignore[arg-type]


def test_ct_is_16_bit_signed_grey() -> None:
    """CT_small.dcm: 128x128, 1 frame, 1 sample, 16-bit signed, no colour transform."""
    info = _classify_file("CT_small.dcm")
    assert info == ImageInfo(
        rows=128,
        columns=128,
        frames=1,
        samples=1,
        precision=16,
        signed=True,
        colour_transform=False,
        source_photometric="MONOCHROME2",
        bits_allocated=16,
        transfer_syntax="1.2.840.10008.1.2.1",
    )


def test_rgb_multiframe_and_ycbcr_sources() -> None:
    """RGB RLE 2-frame is 3 samples with colour transform; the YBR sources keep
    their photometric in source_photometric; MONOCHROME1 is streamed as is."""
    info = _classify_file("SC_rgb_rle_2frame.dcm")
    assert (info.samples, info.frames, info.colour_transform, info.precision) == (3, 2, True, 8)
    assert _classify_file("SC_ybr_full_422_uncompressed.dcm").source_photometric == "YBR_FULL_422"
    assert _classify_file("GDCMJ2K_TextGBR.dcm").source_photometric == "YBR_RCT"
    mono1 = [p for p in get_testdata_files() if p.endswith(os.path.join("CR1", "6154"))][0]
    info = classify(_read(mono1))
    assert (info.source_photometric, info.precision, info.signed) == ("MONOCHROME1", 12, False)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("examples_palette.dcm", "PALETTE COLOR images need their lookup tables"),
        ("liver_1frame.dcm", "Bits Allocated 1 is not supported (only 8 or 16)"),
        ("liver_expb_1frame.dcm", "Bits Allocated 1 is not supported (only 8 or 16)"),
        ("rtdose.dcm", "Bits Allocated 32 is not supported (only 8 or 16)"),
        ("SC_rgb_rle_32bit.dcm", "Bits Allocated 32 is not supported (only 8 or 16)"),
        ("MR_truncated.dcm", "(truncated?)"),
        ("meta_missing_tsyntax.dcm", "Transfer Syntax UID is missing"),
    ],
)
def test_unstreamable_test_files(name: str, reason: str) -> None:
    """pydicom's palette, 1-bit (liver), 32-bit (RT Dose, RGB), truncated and
    syntax-less files raise NotStreamable with a specific reason."""
    with pytest.raises(NotStreamable) as info:
        _classify_file(name)
    assert reason in info.value.reason
    assert str(info.value) == info.value.reason
    assert isinstance(info.value, TranscodeError)


@pytest.mark.parametrize(
    "name, what",
    [
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("reportsi.dcm", "Basic Text SR Storage"),
        ("rtplan.dcm", "RT Plan Storage"),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage"),
        ("UN_sequence.dcm", "no Pixel Data"),
    ],
)
def test_objects_without_pixels_are_not_images(name: str, what: str) -> None:
    """SR, RT Plan, waveform and other pixel-less objects raise NotAnImage naming
    their SOP class."""
    with pytest.raises(NotAnImage, match=what):
        _classify_file(name)


def test_dicomdir_is_not_an_image() -> None:
    """A DICOMDIR (Media Storage Directory) is NotAnImage."""
    suffix = os.path.join("dicomdirtests", "DICOMDIR")
    path = [p for p in get_testdata_files() if p.endswith(suffix)][0]
    with pytest.raises(NotAnImage, match="Media Storage Directory"):
        classify(_read(path))


# --- synthetic datasets ------------------------------------------------------------


def _native(
    values: Any,
    *,
    bits_stored: int = 16,
    signed: bool = False,
    bits_allocated: int = 16,
    photometric: str = "MONOCHROME2",
    samples: int = 1,
    frames: int | None = None,
    ts: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A minimal native image dataset whose Pixel Data holds `values` verbatim."""
    arr = np.asarray(values)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    rows, cols = arr.shape[-2 - (samples == 3) : arr.ndim - (samples == 3)]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    dtype = {8: "u1", 16: "<u2"}.get(bits_allocated, "<u4")
    raw = arr.astype(np.int64) & ((1 << bits_allocated) - 1)
    ds.PixelData = raw.astype(dtype).tobytes()
    return ds


def _only_frame(ds: Dataset) -> tuple[np.ndarray, ImageInfo]:
    info = classify(ds)
    frames = list(iter_frames(ds, info))
    assert len(frames) == 1
    return frames[0], info


def test_unsigned_values_above_bits_stored_are_kept(tmp_path: Path) -> None:
    """Unsigned 12-bit data with values above 4095 keeps them (pydicom's default
    would mask 5000 to 904) and required_precision rises to what they need; the
    frame round-trips through JPEG 2000 at that precision."""
    ds = _native([[0, 4095, 5000, 40000]], bits_stored=12)
    frame, info = _only_frame(ds)
    np.testing.assert_array_equal(frame, [[0, 4095, 5000, 40000]])
    assert ds.pixel_array[0, 2] == 904  # what masking would have done
    assert required_precision(frame, info) == 16
    assert required_precision(_only_frame(_native([[0, 5000]], bits_stored=12))[0], info) == 13
    path = tmp_path / "x.j2k"
    openjpeg.encode(frame, path, precision=16, signed=False, colour_transform=False, params=PARAMS)
    np.testing.assert_array_equal(openjpeg.decode(path), frame)


def test_signed_values_without_sign_extension_are_read_as_bits_stored() -> None:
    """Signed 12-bit data written without sign extension (high bits zero) is read as
    12-bit two's complement, exactly like pydicom: 0x0F38 is -200."""
    ds = _native([[0x0F38, 100, 0x0800]], bits_stored=12, signed=True)
    frame, info = _only_frame(ds)
    np.testing.assert_array_equal(frame, [[-200, 100, -2048]])
    np.testing.assert_array_equal(frame, ds.pixel_array)
    assert required_precision(frame, info) == 12


def test_signed_values_beyond_bits_stored_are_kept() -> None:
    """Sign-extended 16-bit values outside the 12-bit signed range (-5000, 3000) are
    kept rather than wrapped, and need 14 bits."""
    ds = _native([[-5000, 3000, -1, 7]], bits_stored=12, signed=True)
    frame, info = _only_frame(ds)
    np.testing.assert_array_equal(frame, [[-5000, 3000, -1, 7]])
    assert required_precision(frame, info) == 14


def test_overlay_bits_in_pixel_data_are_masked() -> None:
    """When a retired overlay occupies the unused high bits (Overlay Bit Position
    12), those bits are dropped as pydicom does, so they do not become image data."""
    ds = _native([[0x1000 | 100, 200]], bits_stored=12)
    ds.add_new((0x6000, 0x0100), "US", 16)  # Overlay Bits Allocated
    ds.add_new((0x6000, 0x0102), "US", 12)  # Overlay Bit Position
    frame, info = _only_frame(ds)
    np.testing.assert_array_equal(frame, [[100, 200]])
    assert required_precision(frame, info) == 12


def test_required_precision_signed_boundaries() -> None:
    """required_precision counts two's complement bits: -2048..2047 fit 12 bits,
    2048 or -2049 need 13; never below Bits Stored."""
    info = classify(_native([[0]], bits_stored=12, signed=True))
    assert required_precision(np.array([[-2048, 2047]], np.int16), info) == 12
    assert required_precision(np.array([[2048]], np.int16), info) == 13
    assert required_precision(np.array([[-2049]], np.int16), info) == 13
    assert required_precision(np.array([[0, 1]], np.int16), info) == 12
    assert info.precision_of(np.array([[2048]], np.int16)) == 13  # method form


def test_multiframe_frames_are_yielded_one_by_one() -> None:
    """iter_frames is lazy: frames come one at a time in order, so a corrupt second
    frame of an RLE object is only reported after the first was delivered, as a
    NotStreamable naming the frame."""
    ds = _read(get_testdata_file("SC_rgb_rle_2frame.dcm"))  # type: ignore[arg-type]
    expected = ds.pixel_array
    first, _second = generate_frames(ds.PixelData, number_of_frames=2)
    ds.PixelData = encapsulate([first, b"\x00" * 64])
    info = classify(ds)
    frames = iter_frames(ds, info)
    np.testing.assert_array_equal(next(frames), expected[0])
    with pytest.raises(NotStreamable, match="frame 2 of 2 could not be decoded"):
        next(frames)


def test_native_multiframe_yields_every_frame() -> None:
    """A native 3-frame object gives 3 separate rows x columns arrays."""
    data = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    ds = _native(data, frames=3)
    info = classify(ds)
    frames = list(iter_frames(ds, info))
    assert [f.shape for f in frames] == [(4, 5)] * 3
    for frame, plane in zip(frames, data):
        np.testing.assert_array_equal(frame, plane)


def test_missing_frames_are_reported() -> None:
    """An encapsulated object declaring more frames than it holds is NotStreamable."""
    ds = _read(get_testdata_file("SC_rgb_rle_2frame.dcm"))  # type: ignore[arg-type]
    ds.NumberOfFrames = 3
    info = classify(ds)
    with pytest.raises(NotStreamable, match="frame|frames"):
        list(iter_frames(ds, info))


def test_big_endian_frames_come_out_native() -> None:
    """Frames from Explicit VR Big Endian files are in native byte order."""
    ds = _read(get_testdata_file("MR_small_bigendian.dcm"))  # type: ignore[arg-type]
    frame = next(iter_frames(ds, classify(ds)))
    assert frame.dtype.isnative
    little_endian = _read(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(frame, little_endian.pixel_array)


def _without_pixels(ds: Dataset) -> Dataset:
    del ds.PixelData
    return ds


@pytest.mark.parametrize(
    "make, reason",
    [
        (
            lambda: _with(_without_pixels(_native([[0]])), FloatPixelData=b"\0" * 4),
            "Float Pixel Data",
        ),
        (
            lambda: _with(_without_pixels(_native([[0]])), DoubleFloatPixelData=b"\0" * 8),
            "Double Float Pixel Data",
        ),
        (
            lambda: _with(_without_pixels(_native([[0]])), PixelDataProviderURL="http://x/jpip"),
            "held elsewhere",
        ),
        (lambda: _with(_native([[0]]), Rows=0), "image size is 0 x 1"),
        (lambda: _without(_native([[0]]), "Columns"), "Columns is missing"),
        (
            lambda: _with(_native([[0]]), SamplesPerPixel=2, PhotometricInterpretation="RGB"),
            "Samples per Pixel 2",
        ),
        (lambda: _with(_native([[0]]), SamplesPerPixel=3), "contradicts"),
        (lambda: _with(_native([[0]]), PhotometricInterpretation="YBR_PARTIAL_420"), "MPEG video"),
        (lambda: _with(_native([[0]]), PhotometricInterpretation="CMYK"), "retired"),
        (lambda: _with(_native([[0]]), PhotometricInterpretation="XYZ"), "'XYZ' is not supported"),
        (lambda: _with(_native([[0]]), BitsAllocated=12), "Bits Allocated 12 is not supported"),
        (lambda: _with(_native([[0]]), BitsStored=17), "Bits Stored 17"),
        (lambda: _with(_native([[0]], bits_stored=12), HighBit=15), "High Bit 15"),
        (lambda: _with(_native([[0]]), PixelRepresentation=2), "Pixel Representation 2"),
        (lambda: _with(_native([[0]]), NumberOfFrames=0), "Number of Frames is 0"),
        (lambda: _with(_native([[0, 1]]), NumberOfFrames=2), "truncated"),
        (lambda: _meta(_native([[0]]), MPEG2MPML), "video transfer syntax"),
        (lambda: _meta(_native([[0]]), "1.2.840.10008.1.2.4.94"), "JPIP server"),
        (lambda: _meta(_native([[0]]), "1.2.3.4.5"), "no pixel data decoder"),
    ],
)
def test_synthetic_refusals(make: Any, reason: str) -> None:
    """Each kind of unsupported or inconsistent pixel data gets its own specific
    NotStreamable reason."""
    with pytest.raises(NotStreamable, match=re.escape(reason)):
        classify(make())


def test_classify_does_not_need_a_decodable_codestream() -> None:
    """classify looks only at attributes: an RLE object with garbage fragments is
    classified, and the problem surfaces from iter_frames."""
    ds = _native([[1, 2]], ts=RLELossless)
    ds.PixelData = encapsulate([b"garbage!"])
    info = classify(ds)
    with pytest.raises(NotStreamable, match="frame 1 of 1 could not be decoded"):
        list(iter_frames(ds, info))


def _with(ds: Dataset, **attrs: Any) -> Dataset:
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _without(ds: Dataset, keyword: str) -> Dataset:
    delattr(ds, keyword)
    return ds


def _meta(ds: Dataset, ts: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds
